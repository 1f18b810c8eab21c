"""Thresholds from the papers that the profile and the recipe steps share; torch-free, because recipes are
validated before torch is imported."""

HIDDEN_SINK_THRESHOLD = 0.1  # ACT (Yu et al. 2024): column mean of attention above which a key is a hidden sink
