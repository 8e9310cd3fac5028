"""python -m paddlellm.families: rewrite llm/<family>/README.md from the registry."""
from . import write_readmes

write_readmes()
