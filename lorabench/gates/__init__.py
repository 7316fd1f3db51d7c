"""Gates: thresholds.yaml's rules and the comparison of two stored runs."""
