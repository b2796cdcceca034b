"""Finishing a soup: the model card (``card``) and the text report and plot (``report``), both made
from ``soup.json`` (``soup.io.manifest``). Imports: ``soup.io`` and the base modules only.
"""
