"""Pure-Python twins of the compiled core: _twin/<name>.py mirrors _core/<name>.pyx file for file.

Each is the executable spec of its compiled module and the fallback where it cannot be built;
``buttress._impl`` is the one place that picks between them.
"""
