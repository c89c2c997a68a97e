"""Using a motion adapter: DDIM inversion and guided sampling, `generate`, and Show-1's frozen cascade."""
