"""Measuring vmc-fast: `bench` (memory and time per preset), `eval` (motion transfer in the toy world), `demo`,
and the metrics they score with."""
