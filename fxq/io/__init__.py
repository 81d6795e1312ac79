"""The parts of an fxq file behind `fxq.save` / `fxq.load` (fxq/serialize.py): the JSON form of a graph with its
call-target allow-list, and the registry of modules a file may rebuild."""
