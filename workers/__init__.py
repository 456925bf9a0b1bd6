"""The model side: checkpoints, the model card's prompt, scoring, and worker processes.

Nothing imported at package level touches torch: the gRPC front end imports
`workers.checkpoint`, `workers.prompt` and `workers.protocol` and must never
load torch or CUDA. Only `workers.scoring` and `workers.process` (which run in
the worker processes) import torch.
"""
