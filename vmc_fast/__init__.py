"""vmc-fast: Video Motion Customization (VMC) made fast and small.

Only the Q/K/V projections of the temporal attention layers of a text-to-video UNet are tuned, with a
motion-distillation loss on frame-to-frame noise residuals (Jeong, Park and Ye, 2023).

For scripts::

    import vmc_fast

    clip = vmc_fast.load_video("bird.mp4", num_frames=8, height=40, width=64)     # (3, 8, 40, 64) in [-1, 1]
    cfg = vmc_fast.RunConfig(data=vmc_fast.DataConfig(videos="clips/"), prompt="a bird is flying")
    summary = vmc_fast.train(cfg)                       # one adapter per video in cfg.out_dir/adapters/
    tensors, info = vmc_fast.read_adapter("vmc-out/adapters/bird.safetensors")
    result = vmc_fast.generate(vmc_fast.GenerateConfig(adapter="vmc-out/adapters/bird.safetensors",
                                                       video="bird.mp4", prompt="an airplane is flying"))
    vmc_fast.apply_adapter(unet, "vmc-out/adapters/bird.safetensors")   # into a base UNet of your own

Names are imported on first use, so `import vmc_fast` stays light.
"""

__version__ = "0.1.0"

_PUBLIC = {
    "load_video": "vmc_fast.io.video",
    "train": "vmc_fast.runs.launch",
    "generate": "vmc_fast.inference.generate",
    "apply_adapter": "vmc_fast.tuning.adapters",
    "read_adapter": "vmc_fast.tuning.adapters",
    "load_backbone": "vmc_fast.models.registry",
    "RunConfig": "vmc_fast.config",
    "DataConfig": "vmc_fast.config",
    "ModelConfig": "vmc_fast.config",
    "TrainConfig": "vmc_fast.config",
    "ParallelConfig": "vmc_fast.config",
    "GenerateConfig": "vmc_fast.config",
    "VmcError": "vmc_fast.errors",
}
__all__ = ["__version__", *_PUBLIC]


def __getattr__(name: str):
    if name in _PUBLIC:
        import importlib

        return getattr(importlib.import_module(_PUBLIC[name]), name)
    raise AttributeError(f"module 'vmc_fast' has no attribute {name!r}")
