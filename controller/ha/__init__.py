"""High availability: the decision engine, its environment interface and the simulator.

See docs/ha.md for the rules and the safety argument.
"""
