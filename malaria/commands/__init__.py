"""The verbs `make` runs, one module each (`python -m malaria.commands.<verb>`). They import from
the folders below them, never from one another."""
