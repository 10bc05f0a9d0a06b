"""atheris fuzz harnesses (run by `make fuzz`; tests never need atheris)."""
