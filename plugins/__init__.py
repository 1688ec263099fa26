"""Partner plugins shipped with the gateway, one folder per partner."""
