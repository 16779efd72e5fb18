# One static, position-independent library per component folder.
#
# pqkv_add_component(NAME [FOLDER folder] [LINKS targets...] [EXCLUDE files...]
#                    [EXTRA files...])
# builds the target pqkv_NAME from every .cpp in FOLDER (default: NAME) and its
# cpu/ subfolder, and from cuda/ (.cu and .cpp) when the CUDA backend is built.
# A file added to those folders needs no CMake edit. EXCLUDE takes files (paths
# relative to the project) out of the component; EXTRA adds files of another
# folder to it (used to keep benchmark-only code out of libpqkv without moving
# files). LINKS are the components and libraries it builds on, PUBLIC.
#
# Layering: sources include other folders as "folder/file.h". A component
# sees only its own folder and those of the components it links, through
# <build>/layers/<folder>/<folder>, a link to the source folder; a lower
# folder that includes a higher one's header fails to compile. A folder that
# does not exist yet gives an empty target that the others can already link.
function(pqkv_add_component name)
  cmake_parse_arguments(arg "" "FOLDER" "LINKS;EXCLUDE;EXTRA" ${ARGN})
  if(NOT arg_FOLDER)
    set(arg_FOLDER ${name})
  endif()
  set(dir ${PROJECT_SOURCE_DIR}/${arg_FOLDER})
  set(target pqkv_${name})

  set(patterns ${dir}/*.cpp ${dir}/cpu/*.cpp)
  if(PQKV_HAVE_CUDA)
    list(APPEND patterns ${dir}/cuda/*.cu ${dir}/cuda/*.cpp)
  endif()
  file(GLOB sources CONFIGURE_DEPENDS ${patterns})
  foreach(file IN LISTS arg_EXCLUDE)
    list(REMOVE_ITEM sources ${PROJECT_SOURCE_DIR}/${file})
  endforeach()
  foreach(file IN LISTS arg_EXTRA)
    list(APPEND sources ${PROJECT_SOURCE_DIR}/${file})
  endforeach()

  pqkv_layer_root(${arg_FOLDER} root)

  if(sources)
    add_library(${target} STATIC ${sources})
    target_include_directories(${target} PUBLIC ${root})
    target_link_libraries(${target} PUBLIC ${arg_LINKS})
  else()
    add_library(${target} INTERFACE)
    target_include_directories(${target} INTERFACE ${root})
    target_link_libraries(${target} INTERFACE ${arg_LINKS})
  endif()
endfunction()

# Sets `out` to the include root through which "folder/file.h" names only
# that folder of the source tree (see above).
function(pqkv_layer_root folder out)
  set(root ${PROJECT_BINARY_DIR}/layers/${folder})
  if(EXISTS ${PROJECT_SOURCE_DIR}/${folder} AND NOT EXISTS ${root}/${folder})
    file(MAKE_DIRECTORY ${root})
    file(CREATE_LINK ${PROJECT_SOURCE_DIR}/${folder} ${root}/${folder} SYMBOLIC)
  endif()
  set(${out} ${root} PARENT_SCOPE)
endfunction()
