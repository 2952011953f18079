"""The study and search reports (markdown, html, figures) and the terminal summary.

Sits on top: may import every layer below.
"""
