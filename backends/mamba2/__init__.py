"""Mamba-2's state-space duality (SSD): the planner's "ssd" variant. The public function is `backends.ssd(...)`
(backends/mamba2/op.py); the folder is named after the architecture so that the package and the function differ.
"""
