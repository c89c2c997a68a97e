"""Tuning a library of videos: the plan, the manifest that makes a run resumable, and launching ranks."""
