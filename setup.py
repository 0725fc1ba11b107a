"""Packaging beyond pyproject.toml: the recipes.

The top-level ``pretrain/`` and ``finetune/`` folders (one source of truth, where users and the README
look) ship inside the wheel as the data of ``maevit.recipes.pretrain`` / ``maevit.recipes.finetune``
(``maevit/recipes/<stage>/*.yaml``), so ``pip install .`` gives the complete toolkit. pyproject.toml's
static tables cannot add such mapped packages to a ``packages.find`` result, hence this file;
everything else stays in pyproject.toml. ``maevit.recipes.recipe_root`` finds either layout.
"""
from setuptools import find_namespace_packages, setup

RECIPES = {f"maevit.recipes.{stage}": stage for stage in ("pretrain", "finetune")}

setup(
    packages=[*find_namespace_packages(include=["maevit*"]), *RECIPES],
    package_dir=RECIPES,  # their files: [tool.setuptools.package-data] in pyproject.toml
)
