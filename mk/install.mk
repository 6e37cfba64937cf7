# Install layout (issue 9), included by the top-level Makefile:
#     include mk/install.mk
#     install: all install-files
#     uninstall: uninstall-files
# Standalone: make -f Makefile -f mk/install.mk install-files PREFIX=/usr DESTDIR=/tmp/root
#
# Honours PREFIX (default /usr/local), DESTDIR (staging root for packagers) and
# SYSCONFDIR (default /etc, also for PREFIX=/usr/local: the programs' default
# config path is /etc/tidepool/tidepool.conf). The tree is documented in
# docs/deploy.md. Paths inside the units, tmpfiles snippet, example config and
# man pages are rewritten to the chosen PREFIX/SYSCONFDIR. An existing
# $(SYSCONFDIR)/tidepool/tidepool.conf is never overwritten; the new example is
# then written beside it as tidepool.conf.example. No secrets file is installed.

PREFIX     ?= /usr/local
DESTDIR    ?=
SYSCONFDIR ?= /etc
VERSION    ?= 0.0.0
BINDIR     ?= bin
BUILDDIR   ?= build/default

TP_BIN_DIR   := $(PREFIX)/bin
TP_DATA_DIR  := $(PREFIX)/share/tidepool
TP_MAN1_DIR  := $(PREFIX)/share/man/man1
TP_DOC_DIR   := $(PREFIX)/share/doc/tidepool
TP_CONF_DIR  := $(SYSCONFDIR)/tidepool
# Debian bookworm keeps units in /lib/systemd/system (merged /usr makes it the
# same as /usr/lib/systemd/system); systemd also reads /usr/local/lib/systemd/system.
ifeq ($(PREFIX),/usr)
TP_UNIT_DIR  ?= /lib/systemd/system
else
TP_UNIT_DIR  ?= $(PREFIX)/lib/systemd/system
endif
# systemd-sysusers and systemd-tmpfiles read /usr/lib/... and /usr/local/lib/...
TP_SYSUSERS_DIR ?= $(PREFIX)/lib/sysusers.d
TP_TMPFILES_DIR ?= $(PREFIX)/lib/tmpfiles.d

TP_PROGRAMS  := tidepool-sync tidepool-server tidepool-warehouse
TP_SQL_DIRS  := migrations sync queries warehouse
TP_UNITS     := tidepool-sync.service tidepool-server.service
TP_MAN_BUILD := $(BUILDDIR)/man
TP_MANPAGES  := $(patsubst %,$(TP_MAN_BUILD)/%.1,$(TP_PROGRAMS))
TP_STAGE     := $(BUILDDIR)/install-stage

desc_tidepool-sync      := pull Databricks warehouse aggregates into PostgreSQL on a schedule
desc_tidepool-server    := HTTP API for dashboards and forms, served from PostgreSQL
desc_tidepool-warehouse := local Databricks SQL warehouse emulator for demos and tests

# Rewrites the packaging defaults (/usr/bin, /usr/share/tidepool, /etc) in a
# shipped text file to the chosen PREFIX and SYSCONFDIR.
TP_SED_PATHS := sed -e 's|/usr/bin/tidepool-|$(TP_BIN_DIR)/tidepool-|g' \
                    -e 's|/usr/share/tidepool|$(TP_DATA_DIR)|g' \
                    -e 's|/etc/tidepool|$(TP_CONF_DIR)|g'

.PHONY: install-files uninstall-files man tp-always

man: $(TP_MANPAGES)

$(TP_MAN_BUILD)/%.1: $(BINDIR)/% mk/man-from-help.sh tp-always
	@mkdir -p $(dir $@)
	mk/man-from-help.sh $< "$(desc_$*)" $@ $(SYSCONFDIR) $(TP_DATA_DIR)

# Generated per PREFIX, so the stage directory is rebuilt on every install.
$(TP_STAGE): tp-always
	@rm -rf $@ && mkdir -p $@
	@for f in $(TP_UNITS) tidepool.conf tidepool.tmpfiles; do \
	    $(TP_SED_PATHS) systemd/$$f >$@/$$f || exit 1; done
tp-always:

install-files: $(addprefix $(BINDIR)/,$(TP_PROGRAMS)) $(TP_MANPAGES) $(TP_STAGE)
	install -d $(DESTDIR)$(TP_BIN_DIR) $(DESTDIR)$(TP_MAN1_DIR) \
	    $(DESTDIR)$(TP_UNIT_DIR) $(DESTDIR)$(TP_SYSUSERS_DIR) $(DESTDIR)$(TP_TMPFILES_DIR) \
	    $(DESTDIR)$(TP_DOC_DIR)/examples $(addprefix $(DESTDIR)$(TP_DATA_DIR)/,$(TP_SQL_DIRS) web)
	install -m 755 $(addprefix $(BINDIR)/,$(TP_PROGRAMS)) $(DESTDIR)$(TP_BIN_DIR)/
	install -m 644 $(TP_MANPAGES) $(DESTDIR)$(TP_MAN1_DIR)/
	@for d in $(TP_SQL_DIRS); do \
	    files=$$(ls sql/$$d/*.sql 2>/dev/null); \
	    if [ -n "$$files" ]; then \
	        echo "install -m 644 sql/$$d/*.sql $(DESTDIR)$(TP_DATA_DIR)/$$d/"; \
	        install -m 644 $$files $(DESTDIR)$(TP_DATA_DIR)/$$d/ || exit 1; \
	    fi; done
	@if [ -d web ]; then \
	    echo "cp -R web/. $(DESTDIR)$(TP_DATA_DIR)/web/"; \
	    cp -R web/. $(DESTDIR)$(TP_DATA_DIR)/web/ && \
	    chmod -R u=rwX,go=rX $(DESTDIR)$(TP_DATA_DIR)/web; fi
	install -m 644 $(addprefix $(TP_STAGE)/,$(TP_UNITS)) $(DESTDIR)$(TP_UNIT_DIR)/
	install -m 644 systemd/tidepool.sysusers $(DESTDIR)$(TP_SYSUSERS_DIR)/tidepool.conf
	install -m 644 $(TP_STAGE)/tidepool.tmpfiles $(DESTDIR)$(TP_TMPFILES_DIR)/tidepool.conf
	install -m 644 $(TP_STAGE)/tidepool.conf $(DESTDIR)$(TP_DOC_DIR)/examples/tidepool.conf
	install -m 644 systemd/tidepool.env.example $(DESTDIR)$(TP_DOC_DIR)/examples/tidepool.env.example
	install -m 644 docs/deploy.md $(DESTDIR)$(TP_DOC_DIR)/deploy.md
	install -d -m 750 $(DESTDIR)$(TP_CONF_DIR) $(DESTDIR)$(TP_CONF_DIR)/sync $(DESTDIR)$(TP_CONF_DIR)/queries
	install -m 640 systemd/tidepool.env.example $(DESTDIR)$(TP_CONF_DIR)/tidepool.env.example
	@if [ -e $(DESTDIR)$(TP_CONF_DIR)/tidepool.conf ]; then \
	    install -m 640 $(TP_STAGE)/tidepool.conf $(DESTDIR)$(TP_CONF_DIR)/tidepool.conf.example && \
	    echo "install: kept existing $(DESTDIR)$(TP_CONF_DIR)/tidepool.conf; new example in tidepool.conf.example"; \
	else \
	    echo "install -m 640 tidepool.conf $(DESTDIR)$(TP_CONF_DIR)/tidepool.conf"; \
	    install -m 640 $(TP_STAGE)/tidepool.conf $(DESTDIR)$(TP_CONF_DIR)/tidepool.conf; fi
	@if [ -z "$(DESTDIR)" ]; then \
	    echo "install: next, as root: systemd-sysusers tidepool.conf && systemd-tmpfiles --create tidepool.conf"; \
	    echo "install: then: systemctl daemon-reload && systemctl enable --now tidepool-sync tidepool-server"; fi

# Leaves $(SYSCONFDIR)/tidepool/tidepool.conf and tidepool.env (the admin's
# files) and the tidepool user in place, like a Debian "remove" without "purge".
uninstall-files:
	rm -f $(addprefix $(DESTDIR)$(TP_BIN_DIR)/,$(TP_PROGRAMS))
	rm -f $(addprefix $(DESTDIR)$(TP_MAN1_DIR)/,$(addsuffix .1,$(TP_PROGRAMS)))
	rm -f $(addprefix $(DESTDIR)$(TP_UNIT_DIR)/,$(TP_UNITS))
	rm -f $(DESTDIR)$(TP_SYSUSERS_DIR)/tidepool.conf $(DESTDIR)$(TP_TMPFILES_DIR)/tidepool.conf
	rm -rf $(DESTDIR)$(TP_DATA_DIR) $(DESTDIR)$(TP_DOC_DIR)
	rm -f $(DESTDIR)$(TP_CONF_DIR)/tidepool.conf.example $(DESTDIR)$(TP_CONF_DIR)/tidepool.env.example
	rmdir $(DESTDIR)$(TP_CONF_DIR)/sync $(DESTDIR)$(TP_CONF_DIR)/queries 2>/dev/null || true
	rmdir $(DESTDIR)$(TP_CONF_DIR) 2>/dev/null || true
	@if [ -e $(DESTDIR)$(TP_CONF_DIR)/tidepool.conf ]; then \
	    echo "uninstall: kept $(DESTDIR)$(TP_CONF_DIR)/tidepool.conf (remove it by hand to purge)"; fi

# Databricks Apps source tree with bundled libraries (docs/databricks-apps.md).
.PHONY: databricks-app
databricks-app:
	mk/databricks-app.sh build/databricks-app
