"""Package discovery for the mapped layout of pyproject.toml (libs/, services/, schemas/)."""

from setuptools import find_packages, setup

setup(
    packages=[
        *find_packages("libs"),
        "stratamesh.services",
        *(f"stratamesh.services.{p}" for p in find_packages("services")),
        "stratamesh.schemas",
    ]
)
