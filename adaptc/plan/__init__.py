"""The planner: decides which modules of a model get which adapter layer."""
