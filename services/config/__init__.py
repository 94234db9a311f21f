"""Every configuration model of the stack, in one strict tree rooted at `run.RunConfig`.

`base` (the strict base and the error messages), `algorithm`, `trainer`, `task`, `workers`
(rollout worker, scorer, queue), `servers` (rollout and teacher servers) and `run` (the
experiment YAML and its loader). This package depends on pydantic and the standard
library only, so that any process can read a config without loading an engine.
"""
