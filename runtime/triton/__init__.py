"""Serving through Triton: the model repository builder, the generic Python-backend model, the
launcher of the nvidia-pytriton wheel's tritonserver, and the client's shared-memory pool.

``model.py`` here is package data as much as a module: ``posterrt repo build`` copies it into every
``<model>/1/`` of a cpu-flavor repository, where Triton's Python backend runs it.
"""
