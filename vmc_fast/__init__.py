"""vmc-fast: Video Motion Customization (VMC) made fast and small.

Only the Q/K/V projections of the temporal attention layers of a text-to-video UNet are tuned, with a
motion-distillation loss on frame-to-frame noise residuals (Jeong, Park and Ye, 2023).
"""

__version__ = "0.1.0"
