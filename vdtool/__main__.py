from vdtool.quickcli import entry

entry()  # vdtool info FILE and vdtool check FILE without click, every other command line through it
