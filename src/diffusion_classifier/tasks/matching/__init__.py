"""Image-text matching: the matcher (scores images against texts), its example formats and benchmark metrics,
and what the Winoground and caption-pairs tasks share (task.py)."""
