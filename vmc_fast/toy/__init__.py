"""The known-motion world that measures vmc-fast: procedural clips with exact tracks, the toy text-to-video model
trained on them, its pretraining, and the shipped held-out example clips. Part of the harness: the product never
imports it (the backbone registry finds the toy model by module name)."""
