# Yunying top-level Makefile.
#
#   make          release build of yunying-edge, yunying-cloud and the web bundle
#   make run      install what is missing, build, start edge + cloud, load a sample
#   make test     ASan+UBSan build, then every suite (unit, integration, e2e)
#   make check    unit tests only (fast edit loop)
#   make bench    benchmarks against anchors (tests/bench)
#
# Objects go to build/<config>/ (release or asan). Sources are picked up by
# wildcard, so adding a module means adding a file, not editing this file.

CONFIG   ?= release
BUILD    := build/$(CONFIG)
CC       ?= cc
CXX      ?= g++

WARN     := -Wall -Wextra -Wshadow -Wstrict-prototypes
CSTD     := -std=c11 -D_GNU_SOURCE
CXXSTD   := -std=c++17
INCS     := -Icommon/include -Iproto/include -I/usr/share/include/llhttp -I/usr/include/postgresql
DEPFLAGS  = -MMD -MP

ifeq ($(CONFIG),asan)
OPT      := -O1 -g -fsanitize=address,undefined -fno-sanitize-recover=all -fno-omit-frame-pointer
LDSAN    := -fsanitize=address,undefined
else
OPT      := -O2 -g
LDSAN    :=
endif
ifneq ($(WERROR),)
WARN     += -Werror
endif

CFLAGS_ALL   = $(CSTD) $(WARN) $(OPT) $(INCS) $(DEPFLAGS) $(CFLAGS)
CXXFLAGS_ALL = $(CXXSTD) -Wall -Wextra $(OPT) $(INCS) $(DEPFLAGS) $(CXXFLAGS)

LIBS_BASE := -luv -lsqlite3 -lpq -ljansson -lcurl -lmbedtls -lmbedx509 -lmbedcrypto -lcharls -lxxhash -lpthread -lm
LIBS_DCM  := -ldcmjpls -ldcmnet -ldcmdata -loflog -lofstd -lz -lstdc++
LDLIBS_ALL = $(LIBS_BASE) $(LIBS_DCM)

LLHTTP_SRC := /usr/share/llhttp/llhttp.c /usr/share/llhttp/api.c /usr/share/llhttp/http.c
LLHTTP_OBJ := $(patsubst /usr/share/llhttp/%.c,$(BUILD)/llhttp/%.o,$(LLHTTP_SRC))

COMMON_C   := $(wildcard common/*.c)
COMMON_CC  := $(wildcard common/*.cc)
COMMON_OBJ := $(COMMON_C:%.c=$(BUILD)/%.o) $(COMMON_CC:%.cc=$(BUILD)/%.o) $(LLHTTP_OBJ)
PROTO_OBJ  := $(patsubst %.c,$(BUILD)/%.o,$(wildcard proto/*.c))
EDGE_OBJ   := $(patsubst %.c,$(BUILD)/%.o,$(wildcard edge/*.c)) \
              $(patsubst %.cc,$(BUILD)/%.o,$(wildcard edge/*.cc))
CLOUD_OBJ  := $(patsubst %.c,$(BUILD)/%.o,$(wildcard cloud/*.c)) \
              $(patsubst %.cc,$(BUILD)/%.o,$(wildcard cloud/*.cc))

LIBCOMMON  := $(BUILD)/libyycommon.a
# The daemons' modules without main(), so unit tests can link what they use.
LIBEDGE    := $(BUILD)/libyyedge.a
LIBCLOUD   := $(BUILD)/libyycloud.a
LIBPROTO   := $(BUILD)/libyyproto.a
EDGE_BIN   := $(BUILD)/yunying-edge
CLOUD_BIN  := $(BUILD)/yunying-cloud

# Unit tests: tests/unit/<dir>/test_<name>.c, one binary each (cmocka).
UNIT_SRC   := $(wildcard tests/unit/*/test_*.c)
UNIT_BIN   := $(UNIT_SRC:tests/unit/%.c=$(BUILD)/tests/unit/%)

WEB_DIR    := cloud/web
WEB_STAMP  := $(WEB_DIR)/dist/index.html
WEB_SRC    := $(shell find $(WEB_DIR)/src $(WEB_DIR)/public $(WEB_DIR)/index.html \
                $(WEB_DIR)/package.json $(WEB_DIR)/vite.config.ts $(WEB_DIR)/tsconfig.json \
                -type f 2>/dev/null)

.PHONY: all bins web run test check bench deps clean format
all: bins web

bins: $(EDGE_BIN) $(CLOUD_BIN)

deps:
	./deploy/install-deps.sh

$(BUILD)/llhttp/%.o: /usr/share/llhttp/%.c
	@mkdir -p $(@D)
	$(CC) $(CSTD) $(OPT) -w -I/usr/share/include/llhttp -c $< -o $@

$(BUILD)/%.o: %.c
	@mkdir -p $(@D)
	$(CC) $(CFLAGS_ALL) -c $< -o $@

$(BUILD)/%.o: %.cc
	@mkdir -p $(@D)
	$(CXX) $(CXXFLAGS_ALL) -c $< -o $@

$(LIBCOMMON): $(COMMON_OBJ)
	@rm -f $@
	ar rcs $@ $^

$(LIBEDGE): $(filter-out $(BUILD)/edge/main.o,$(EDGE_OBJ))
	@rm -f $@
	ar rcs $@ $^

$(LIBCLOUD): $(filter-out $(BUILD)/cloud/main.o,$(CLOUD_OBJ))
	@rm -f $@
	ar rcs $@ $^

$(LIBPROTO): $(PROTO_OBJ)
	@rm -f $@
	ar rcs $@ $^

$(EDGE_BIN): $(EDGE_OBJ) $(LIBPROTO) $(LIBCOMMON)
	$(CXX) $(LDSAN) -o $@ $(EDGE_OBJ) $(LIBPROTO) $(LIBCOMMON) $(LDLIBS_ALL)

$(CLOUD_BIN): $(CLOUD_OBJ) $(LIBPROTO) $(LIBCOMMON)
	$(CXX) $(LDSAN) -o $@ $(CLOUD_OBJ) $(LIBPROTO) $(LIBCOMMON) $(LDLIBS_ALL)

# A unit test may #include the .c file it tests (to reach static functions);
# archive members are only pulled in for symbols still undefined, so the
# included module's own object is never linked twice.
$(BUILD)/tests/unit/%: tests/unit/%.c $(LIBEDGE) $(LIBCLOUD) $(LIBPROTO) $(LIBCOMMON)
	@mkdir -p $(@D)
	$(CXX) -x c $(CFLAGS_ALL) -o $@ $< -x none $(LIBEDGE) $(LIBCLOUD) $(LIBPROTO) $(LIBCOMMON) \
	    $(LDSAN) $(LDLIBS_ALL) -lcmocka

unit-bins: $(UNIT_BIN)

web: $(WEB_STAMP)

$(WEB_STAMP): $(WEB_SRC) $(WEB_DIR)/package-lock.json
	./deploy/install-deps.sh
	cd $(WEB_DIR) && npm run build --silent

run:
	./deploy/install-deps.sh
	$(MAKE) all
	./deploy/quickstart.sh

# make test: sanitizer build, then every suite; tests/run-all.sh prints the
# closing "N passed, N failed" line and fails if any suite failed.
test:
	./deploy/install-deps.sh
	$(MAKE) CONFIG=asan bins unit-bins
	$(MAKE) web
	./tests/run-all.sh build/asan

check:
	$(MAKE) CONFIG=asan bins unit-bins
	./tests/run-all.sh build/asan unit

bench:
	./deploy/install-deps.sh
	$(MAKE) all
	./tests/bench/run.sh build/release

clean:
	rm -rf build $(WEB_DIR)/dist

-include $(shell find build -name '*.d' 2>/dev/null)
