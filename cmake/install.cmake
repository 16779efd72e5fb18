# `find_package(pqkv)` support: headers, the library and a package config.
include(GNUInstallDirs)
include(CMakePackageConfigHelpers)

install(TARGETS pqkv EXPORT pqkvTargets
  LIBRARY DESTINATION ${CMAKE_INSTALL_LIBDIR}
  ARCHIVE DESTINATION ${CMAKE_INSTALL_LIBDIR}
  RUNTIME DESTINATION ${CMAKE_INSTALL_BINDIR}
  INCLUDES DESTINATION ${CMAKE_INSTALL_INCLUDEDIR})
install(DIRECTORY include/pqkv DESTINATION ${CMAKE_INSTALL_INCLUDEDIR})
install(EXPORT pqkvTargets NAMESPACE pqkv:: DESTINATION ${CMAKE_INSTALL_LIBDIR}/cmake/pqkv)
configure_package_config_file(cmake/pqkvConfig.cmake.in
  ${CMAKE_CURRENT_BINARY_DIR}/pqkvConfig.cmake
  INSTALL_DESTINATION ${CMAKE_INSTALL_LIBDIR}/cmake/pqkv)
write_basic_package_version_file(${CMAKE_CURRENT_BINARY_DIR}/pqkvConfigVersion.cmake
  COMPATIBILITY SameMinorVersion)
install(FILES ${CMAKE_CURRENT_BINARY_DIR}/pqkvConfig.cmake
              ${CMAKE_CURRENT_BINARY_DIR}/pqkvConfigVersion.cmake
        DESTINATION ${CMAKE_INSTALL_LIBDIR}/cmake/pqkv)
