// Stands in for the toolkit's header in the CPU emulation build (see emulation.h).
#pragma once
#include "emulation.h"
