"""The built-in actions (registered on import; see :mod:`hookscope.actions`)."""
