"""Evaluation: concepts, their item sets (dilemmas, CAA's A/B questions), scores, Steering F1."""
