"""Trained artifacts the project builds and ships (weights as ``.npz``/``.json``, never pickle).

Each artifact has a version in its file name and a JSON metadata file beside it (training data,
script, parameters, metrics, sha256); the script named there rebuilds it deterministically.
This folder is a package only so that installs from a wheel carry its data files.
"""
