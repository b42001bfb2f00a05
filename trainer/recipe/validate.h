// validate() with the keys' locations, so a message can point at the line that set the key.
#pragma once
#include "trainer/recipe/recipe.h"
#include "trainer/recipe/schema.h"

namespace dsx {

void validate(const Recipe& recipe, const schema::Locations* locations);

}  // namespace dsx
