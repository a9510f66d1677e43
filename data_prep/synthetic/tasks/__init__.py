"""Text grammars, one module per task; each reads only the kept scene description."""
