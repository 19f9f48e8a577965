"""The merge engine: `W_eff = W_base + ΔW` written as new checkpoints, streaming and exact.

Import-light on purpose (`loramill merge` starts fast): import the submodules you need,
e.g. `from merge.streaming import merge_streaming, AdapterRef, MergeResult`.
"""
