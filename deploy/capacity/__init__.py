"""Memory, predicted and measured: the planner (planner.py) sizes a recipe for a GPU from
config.json alone; memory.py reports what a running engine holds (GET /memory)."""
