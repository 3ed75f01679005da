"""Imports every command module so that its ``@app.command`` decorators run.

Add one import line per command module.
"""
