"""The planner (issue 17): measured inputs (profile.py), the layouts a world size allows
(space.py), the cost model (model.py, from each strategy's own formula), and the `plan`
command (command.py)."""
