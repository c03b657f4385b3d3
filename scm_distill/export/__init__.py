"""Exporting students: pipeline folders, model cards, publishing to the Hub."""
