"""The planner's parts (issue 17): measured inputs (profile.py), the layouts a world size
allows (space.py); the cost model and the search build on them."""
