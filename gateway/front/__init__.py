"""`llm-gateway front`: an HAProxy configuration that routes by model across gateways.

topology.py describes the gateways and groups their models into backends (pure),
haproxy.py writes the configuration (pure), fetch.py asks the gateways, cli.py is the
command.
"""
