"""The adapter layer: the Denoiser interface (denoiser.py) that hides each model family's parameterisation,
one module per family, and how models are found, fetched and loaded (loading, hub, finetunes, schedules,
estimate). Nothing here knows about candidates, strategies or tasks."""
