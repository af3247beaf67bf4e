"""omniforge: compile NExT-GPT-style any-to-any pipelines for deployment."""

__version__ = "0.1.0"
