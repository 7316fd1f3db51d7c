"""Reports for people: the terminal summary, Markdown/HTML pages, plots, Allure, comparison output, tables."""
