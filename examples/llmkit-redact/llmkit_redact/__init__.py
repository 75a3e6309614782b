"""llmkit-redact: PII redaction for llmkit, as an example of a plugin package.

``redact(text)`` replaces e-mail addresses, phone numbers, payment card numbers, IBANs, IP
addresses and US social security numbers with placeholders such as ``[EMAIL]``. The plugin
module (``llmkit_redact.plugin``) wires it into llmkit through four hooks.
"""

from llmkit_redact.redact import PATTERNS, Finding, find, redact

__all__ = ["PATTERNS", "Finding", "find", "redact"]
__version__ = "0.1.0"
