"""casruns' built-in plugins, installed as the ``casruns_builtins`` package.

They are found through the ``casruns`` entry-point group, the same way a third-party
plugin is (see spec/plugins.md once the plugin interface lands).
"""
