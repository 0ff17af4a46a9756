"""DSpark serving: target + drafter + scheduler behind LitServe (issue #5)."""
