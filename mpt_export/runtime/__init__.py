"""Runtimes over a bundle. A backend subclasses :class:`~mpt_export.runtime.base.Session` and implements
``_run_backbone_impl`` / ``_run_composer_impl``; input checks, prompt composition and caching live in the base."""
