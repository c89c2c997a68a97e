"""Input and output: video files and frame folders in and out, prompts and their embedding cache, files written
atomically."""
