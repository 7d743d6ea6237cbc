"""Machine-learning side of the portrait service: base pipeline, LoRA training, rendering, AIGC labels."""
