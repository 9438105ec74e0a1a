"""The swarmlog demo: agents that analyse the source of installed Python packages."""
