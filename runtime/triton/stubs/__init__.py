"""The Python-backend stubs of the server stages (runtime/server_stages): one module per stage,
copied by ``posterrt repo build`` into ``<stage>/1/model.py``; ``requests`` holds what they share.
Unlike the generic model.py they need posterrt in the stub's Python."""
