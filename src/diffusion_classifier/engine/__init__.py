"""The scoring engine: model-agnostic over the Denoiser interface. ScoringConfig (config.py), the paired
(t, noise) scoring loop (scoring.py), strategies that decide which candidates meet which timesteps
(strategies, shortlists, replay, simulation), and how errors become rankings and probabilities
(probabilities, robust)."""
