"""What only the app and the notebooks use: background runs (runner) and their charts
(altair). The library itself never imports this package."""
